"""The bitplan version, on the ground floor so every stage can record it without importing the face."""
__version__ = "0.2.0"
