//! The mesh's kernel programs, linked into one BPF object that the node agent
//! (`ztunnel`) and the lab embed and load with aya.
#![no_std]
#![no_main]

mod capture;
mod fastpath;
mod service_lb;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
