"""Datasets: the procedural shapes set (tests, demo); EmojiPrefs and user data come with training."""
