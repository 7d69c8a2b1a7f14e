#![no_main]
//! `pg_entra::fuzzing::cli_output`: any input gives a value or a typed error, never a panic, and the
//! invariants that function asserts hold.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pg_entra::fuzzing::cli_output(data);
});
