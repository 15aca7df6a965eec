"""Media files a person can open (PNG, MP4, WAV, PLY), read and written; shared by data preparation and sample writing.
``spec``: what a generator's media look like (sizes, rates, token costs), stated in the model and followed by the data.
``files``: any file written whole or not at all (``atomic_write``), for every layer."""
