"""VM serial consoles: tickets, the REST view that issues them, and the control side's link to a
node's console through DWCP (used by the streams service's WebSocket and ``manage.py console``); the
console page in the browser (``pages``)."""
