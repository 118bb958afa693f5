"""The network and its cut into local modules: blocks, heads, decoder, contexts, losses."""
