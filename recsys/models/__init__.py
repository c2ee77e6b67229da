"""recsys.models"""

# Heads of the user encoder's self-attention; the item embedding dimension must be a multiple.
# Here rather than in user_encoder.py so that the config's check reads it without loading Keras.
NUM_HEADS = 4
