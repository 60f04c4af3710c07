"""A script that never imports torch: nanwatch run must start and end it unchanged."""

import sys

print("plain python ran")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
