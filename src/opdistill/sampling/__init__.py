"""How completions are made: the KV-cached sampler and its decode step, SKD's guide, TRD's refinement."""
