"""Self-interpretability Experiment 1: instil decision weights in an LLM and measure how well they are recovered."""
