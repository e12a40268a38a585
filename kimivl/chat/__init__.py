"""Serving layer: chat session, CLI chat, HTTP server. Nothing below imports it."""
