"""The miniature study: a procedural world, its trained VQ tokenizer and base model, and an
exact scorer, so fine-tuning, sweeps and promotion decide on real differences on a CPU."""
