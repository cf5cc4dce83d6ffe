"""Judging speech: speaking a model (synthesis, batched, streaming and compiled), the judges that score what it says
(WER/CER, speaker similarity, DNSMOS), the evaluation of a model over a split, and the table of metrics.

May import: the system, model and data parts.
"""
