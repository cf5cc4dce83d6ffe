"""The data: audio in and out and its DNSMOS quality, metadata files, recordings cut into clips, dataset sources
(local or hub), encoding them into the token file and the token file itself, preference files, the layout of a
conversation's turns as frames, and tiny stand-ins of every asset for the tests and the demo.

May import: the system and model parts.
"""
