"""Instruction tuning (the paper's Alpaca stage), data side: records, templates, encoding, packing.

    records.py    Alpaca-style and chat JSON / JSON Lines readers -> Conversation, bad records counted
    templates.py  the paper's templates (alpaca = v1, llama2 = v2) and any Jinja chat template ->
                  prompt / target segments; the same text is the exported tokenizer's chat_template
    encode.py     segments -> input_ids + loss mask (responses only), the paper's token stream exactly
    pack.py       encoded examples -> fixed-size blocks (packed without splitting, or padded)
    shipped.py    the demo's instruction set under cllama_dist/assets/instructions/

No torch import anywhere here: all of it runs in the offline preprocessor on CPU nodes.
"""
