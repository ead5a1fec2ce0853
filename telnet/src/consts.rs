//! Telnet protocol constants: RFC 854 command bytes and the option codes the
//! SCM hub and its clients negotiate (see [`opt`]).

/// Interpret As Command: starts every telnet command; doubled it is data 0xFF.
pub const IAC: u8 = 255;
/// Demand that the peer stop performing an option.
pub const DONT: u8 = 254;
/// Ask the peer to start performing an option.
pub const DO: u8 = 253;
/// Refuse to perform (or stop performing) an option.
pub const WONT: u8 = 252;
/// Offer to perform (or confirm performing) an option.
pub const WILL: u8 = 251;
/// Start of subnegotiation.
pub const SB: u8 = 250;
/// Go ahead.
pub const GA: u8 = 249;
/// Erase line.
pub const EL: u8 = 248;
/// Erase character.
pub const EC: u8 = 247;
/// Are you there.
pub const AYT: u8 = 246;
/// Abort output.
pub const AO: u8 = 245;
/// Interrupt process (Ctrl-C in most clients).
pub const IP: u8 = 244;
/// Break.
pub const BRK: u8 = 243;
/// Data mark (the data part of a Synch).
pub const DM: u8 = 242;
/// No operation.
pub const NOP: u8 = 241;
/// End of subnegotiation.
pub const SE: u8 = 240;

/// Telnet option codes.
pub mod opt {
    /// RFC 857 echo.
    pub const ECHO: u8 = 1;
    /// RFC 858 suppress go-ahead.
    pub const SGA: u8 = 3;
    /// RFC 859 status.
    pub const STATUS: u8 = 5;
    /// RFC 860 timing mark.
    pub const TIMING_MARK: u8 = 6;
    /// RFC 1091 terminal type.
    pub const TTYPE: u8 = 24;
    /// RFC 1073 negotiate about window size.
    pub const NAWS: u8 = 31;
    /// RFC 1184 line mode.
    pub const LINEMODE: u8 = 34;
    /// RFC 1572 new environment.
    pub const NEW_ENVIRON: u8 = 39;
}
