"""The model's token ends beside the decoder: the embedding graph (token ids -> ``hidden_in``)
and the LM-head graph (``hidden_out`` -> logits), and MiniCPM-o's TTS audio ends."""
