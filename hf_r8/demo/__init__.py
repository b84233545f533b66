"""The demo (`hf-r8 demo`) and what the examples, notebook, tests and benchmarks share to run offline: the
Hub check, a local corpus and tokenizer, GPT-2 and Mixtral models built from a config. Not the library."""
