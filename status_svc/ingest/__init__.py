"""Following orchestrators and writing what they say."""
