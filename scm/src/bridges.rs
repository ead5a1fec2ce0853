//! The print-server bridges: Generic (a TCP line per card, print server connects in) and
//! RFIDeas 241 Client Mode (HTTP/HTTPS requests per swipe, configuration over HTTP).

pub mod generic;
pub mod rfideas;
