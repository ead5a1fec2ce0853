//! Placeholder: the Generic network card reader bridge (being written).
