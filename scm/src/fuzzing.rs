//! The parsers the cargo-fuzz targets (`fuzz/`) drive, and nothing else: each faces a
//! peer or an operator.

pub use crate::bridges::generic::last_command;
pub use crate::bridges::rfideas::http;
pub use crate::front::telnet::command::{ParseError, parse as parse_command};
pub use crate::front::telnet::reply::{Reply, ReplyCode};
pub use crate::ops::fleet::Target;
