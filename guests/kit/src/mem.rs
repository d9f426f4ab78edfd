//! The memory functions the compiler expects to find (there is no libc).
//!
//! Written with string instructions in inline assembly rather than loops: LLVM recognises a
//! byte-copy loop as `memcpy` and would compile `memcpy` into a call to itself. `rep movsb` and
//! `rep stosb` also work in KVM's instruction emulator. `bcmp` is here because LLVM turns
//! `memcmp(..) == 0` (slice equality) into `bcmp`.

use core::arch::asm;

/// # Safety
/// `dest` and `src` must be valid for `n` bytes and must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid; the direction flag is clear
    // (the entry stub clears it and nothing sets it for long).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
/// `dest` and `src` must be valid for `n` bytes; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // A forward copy never overwrites bytes it has yet to read here.
        // SAFETY: same contract as this function.
        return unsafe { memcpy(dest, src, n) };
    }
    if n == 0 {
        return dest;
    }
    // Overlap with `dest` above `src`: copy backwards from the last byte.
    // SAFETY: the caller guarantees both ranges are valid; DF is restored to clear, which the
    // rest of the code assumes.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// # Safety
/// `dest` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid; DF is clear.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut pa = a;
    let mut pb = b;
    // `repe cmpsb` stops after the first differing byte, or after n equal bytes.
    // SAFETY: the caller guarantees both ranges are valid; DF is clear.
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => _,
            inout("rsi") pa,
            inout("rdi") pb,
            options(nostack, readonly)
        );
    }
    if pa == a {
        return 0; // n == 0
    }
    // SAFETY: cmpsb advanced both pointers just past the last byte it compared, which lies
    // inside both ranges; if all n bytes were equal that last pair is equal too.
    let (x, y) = unsafe { (*pa.sub(1), *pb.sub(1)) };
    i32::from(x) - i32::from(y)
}

/// # Safety
/// `a` and `b` must be valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}

/// The index of the first of `n` bytes where `a` and `b` differ, if any: eight bytes a step
/// (`repe cmpsq`), then the differing word or the tail byte by byte. For checking bulk data
/// in a guest that runs at ~2M instructions a second.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes.
pub unsafe fn first_difference(a: *const u8, b: *const u8, n: usize) -> Option<usize> {
    let words = n / 8;
    let mut checked = 0;
    if words > 0 {
        let left: usize;
        let differ: u8;
        // SAFETY: the caller guarantees both ranges are valid for `words * 8 <= n` bytes; DF is
        // clear. With a nonzero count `repe cmpsq` leaves ZF from its last comparison.
        unsafe {
            asm!(
                "repe cmpsq",
                "setne {differ}",
                differ = out(reg_byte) differ,
                inout("rcx") words => left,
                inout("rsi") a => _,
                inout("rdi") b => _,
                options(nostack, readonly)
            );
        }
        checked = if differ != 0 {
            (words - left - 1) * 8
        } else {
            words * 8
        };
    }
    (checked..n).find(|&i| {
        // SAFETY: `i < n`, inside both ranges.
        unsafe { a.add(i).read() != b.add(i).read() }
    })
}
