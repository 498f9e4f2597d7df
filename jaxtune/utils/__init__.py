"""Small helpers shared across jaxtune (tree paths)."""
