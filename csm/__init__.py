"""The csm-train library, in five parts that import one way only:

    system -> model -> data -> judging -> training

A part imports the parts to its left and never one to its right. The commands at the repository's top level
(train.py, pretokenize.py, ...) compose the parts; of the two modules beside them, dataloaders.py (token-file
examples -> training batches) uses the model and data parts and is used by training, and utils.py (what every
command shares at its edge) is used by the commands alone. tests/commands/test_layout.py reads the imports and holds
this order.
"""
