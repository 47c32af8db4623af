"""Who scores the student's tokens: a model in this process, a remote server, and the scoring server."""
