"""The input pipeline: corpus -> tokenizer -> NSP pairs -> masking -> global batches.

Modules: `corpus` (documents of sentences), `sentences` (the splitter), `tokenizer`
(sentencepiece / WordPiece), `token_store` (the tokenised, memory-mapped cache), `pairs`,
`masking`, `keyed_random` (stateless draws), `pipeline` (batches, eval, iterator, preview),
`bench` (throughput). Import the one you need; this package imports nothing heavy.
"""
