//! Test-only guest: a well-formed module built with wit-bindgen for a world
//! of its own (`wit/other.wit`), not the projection world. It stands for a
//! wasm file made for some other host, which `projector` must refuse clearly.
//!
//! It has its own WIT on purpose: it must not share the projection contract.

// The generated export glue is the only unsafe code, as in the SDK's export!.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod other {
    wit_bindgen::generate!({ path: "wit", world: "other" });

    struct Other;

    impl Guest for Other {
        fn run() -> u32 {
            42
        }
    }

    export!(Other);
}
