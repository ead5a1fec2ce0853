//! Placeholder: card swipe sources (being written).
