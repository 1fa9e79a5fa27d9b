"""`medlava serve`: a local web page that classifies one dropped image with a CNN or VLM checkpoint."""
