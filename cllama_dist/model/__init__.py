"""Model set-up: vocabulary extension with a structural split of old and new rows, adapters."""
