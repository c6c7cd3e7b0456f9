"""jcnn.data."""
