"""Worker processes: one model replica each, supervised by the front-end."""
