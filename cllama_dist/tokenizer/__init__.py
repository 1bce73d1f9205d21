"""The vocabulary stage: train a new-language SentencePiece model, merge it into the base, report."""
