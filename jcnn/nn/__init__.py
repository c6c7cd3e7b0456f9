"""jcnn.nn."""
