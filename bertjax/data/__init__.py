"""The input pipeline: corpus -> tokenizer -> NSP pairs -> masking -> global batches.

Imports nothing of the model, Flax or the parallel code: it produces numpy arrays, and the
trainer places them on the mesh. Import the module you need; this package imports nothing.
"""
