"""nbdkit plugins of dirtydiff. ``tracker.py`` is the file nbdkit loads; the
logic it calls lives in modules here that do not import nbdkit."""
