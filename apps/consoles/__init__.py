"""A VM's serial console for its users: the console page in the browser (``pages``)."""
