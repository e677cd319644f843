"""Evaluation of FiRST strategies on the real runtime: HumanEval pass@1 in a sandbox,
teacher-forced agreement/KL/perplexity, greedy agreement."""
