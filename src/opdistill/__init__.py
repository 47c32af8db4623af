"""opdistill: on-policy distillation of language models.

The student samples its own completions, a teacher scores every token of them, and the student
trains on that dense signal in the states it actually reaches.
"""

__version__ = "0.1.0"
