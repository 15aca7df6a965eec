"""Media files a person can open (PNG, MP4, WAV, PLY), read and written; shared by data preparation and sample writing."""
