"""The artifact contract: `manifest.json`, read by every runtime and written by every exporter."""
