"""The serving layer: one object per surface (completions, chat, generate, attention) between thin routes and the
engine client; n, echo, logprobs, usage, stop strings, beam search and errors live here once."""
