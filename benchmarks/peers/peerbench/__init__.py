"""Side-by-side speed benchmark of seq2seq against Joey NMT and OpenNMT-py (see ../README.md)."""
