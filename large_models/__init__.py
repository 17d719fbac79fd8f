"""OPT-style causal language models: the paper's OPT tasks, scored as likelihood or generated."""
