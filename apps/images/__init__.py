"""Images as a product: import (upload or URL), the content-addressed store, and which node holds what."""
