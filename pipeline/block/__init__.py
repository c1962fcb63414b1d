"""The block engine: a block's forward, local loss and update, its optimizer, precision and non-finite guard."""
