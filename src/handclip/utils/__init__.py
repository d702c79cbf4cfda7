"""Small helpers shared by several layers; they import nothing of HandCLIP but its errors."""
