"""Serving engines the edit app runs on beyond one process (optional extras, imported only by
whoever uses them): ``ray_serve``."""
