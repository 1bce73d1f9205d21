"""Real pretrained bases, fetched from a package registry and converted once into plain Hugging Face folders."""
