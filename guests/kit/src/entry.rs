//! The PVH entry: the Xen ELF note, the 32-bit boot stub, the AP trampoline, the GDT, and the
//! never-zeroed memory for page tables and stacks.
//!
//! Boot path (BSP): a PVH loader (Veil, QEMU) enters `pvh_entry32` in 32-bit flat protected
//! mode, paging off, EBX = physical address of `hvm_start_info`. The stub zeroes .bss, builds
//! an identity map of the first 4 GiB with 2 MiB pages (RAM above 4 GiB is added from Rust,
//! where the memory map is easy to read), enables PAE, long mode and SSE, loads the GDT and
//! calls `boot::kit_main(start_info)` on the BSP stack. It touches no memory below 1 MiB, so the
//! boot data is intact when Rust copies it out.
//!
//! AP path: `smp` copies `kit_trampoline_start..kit_trampoline_end` to
//! `layout::TRAMPOLINE_BASE` and sends INIT-SIPI-SIPI. The AP starts there in real mode, loads
//! the kit GDT, switches to 32-bit protected mode and jumps into the kit image at
//! `kit_ap_entry32`, which enters long mode with the BSP's page tables, takes a ticket from
//! `smp::AP_ARRIVALS` to pick its own stack and calls `smp::ap_main(ticket)`.

use crate::layout::{AP_STACK_SHIFT, AP_STACK_SIZE, BSP_STACK_SIZE, MAPPED_GIB, MAX_CPUS};

core::arch::global_asm!(
    r#"
    /* ---- PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen", the 32-bit entry address. ----
     * The descriptor is 8 bytes (the address zero-extended): QEMU reads a 64-bit value,
     * linux-loader reads the low 32 bits, Xen accepts either size. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry32
    .balign 4
    .popsection

    /* ---- GDT: 0x08 64-bit code, 0x10 flat data, 0x18 32-bit flat code (for APs). ----
     * Accessed bits are preset so the CPU never writes to the table. */
    .pushsection .data.kit_gdt, "aw", @progbits
    .balign 16
kit_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cf9b000000ffff
kit_gdt_end:
    .balign 8
kit_gdt_ptr:
    .word kit_gdt_end - kit_gdt - 1
    .long kit_gdt
    .popsection

    /* ---- The boot page tables, built by the assembler: the loader copies them with the
     * image, so the emulated guest spends no time on them. They map the first GiB with 2 MiB
     * pages, and the LAPIC's 2 MiB page uncached (PCD | PWT). RAM above 1 GiB is mapped by
     * `paging::map_ram` into `kit_pd`. ---- */
    .pushsection .data.kit_page_tables, "aw", @progbits
    .balign 4096
    .globl kit_pml4, kit_pdpt, kit_pd_low, kit_pd_mmio
kit_pml4:
    .quad kit_pdpt + 3
    .fill 511, 8, 0
kit_pdpt:
    .quad kit_pd_low + 3
    .quad 0
    .quad 0
    .quad kit_pd_mmio + 3
    .fill 508, 8, 0
kit_pd_low:
    .set kit_pde, 0
    .rept 512
    .quad (kit_pde << 21) | 0x83
    .set kit_pde, kit_pde + 1
    .endr
kit_pd_mmio:
    .fill 503, 8, 0
    .quad 0xfee00000 | 0x9b
    .fill 8, 8, 0
    .popsection

    /* The C-bit as a page-table mask, 0 unless SEV is active (set by the BSP's entry). */
    .pushsection .data.kit_sev, "aw", @progbits
    .balign 8
    .globl kit_c_bit_mask
kit_c_bit_mask:
    .quad 0
    .popsection

    /* ---- More page directories and the stacks: inside the image, never zeroed (link.ld). ---- */
    .pushsection .noinit.kit, "aw", @nobits
    .balign 4096
    .globl kit_pd
kit_pd:
    .skip 4096 * {mapped_gib}
    .balign 16
kit_bsp_stack:
    .skip {bsp_stack}
kit_bsp_stack_top:
kit_ap_stacks:
    .skip {ap_stack} * ({max_cpus} - 1)
    .popsection

    /* Enter long mode from 32-bit protected mode (paging off) using the kit page tables, and
     * far-jump to `target` in the 64-bit code segment. Clobbers EAX, ECX, EDX. */
    .macro KIT_ENTER_LONG_MODE target
    /* CR4: PAE (needed for long mode), OSFXSR + OSXMMEXCPT (Rust code uses SSE2). */
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $kit_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    /* CR0: PG (activates long mode) + PE, MP on and EM off for SSE. */
    movl %cr0, %eax
    andl $0xfffffffb, %eax
    orl $0x80000003, %eax
    movl %eax, %cr0
    lgdt kit_gdt_ptr
    ljmp $0x08, $\target
    .endm

    /* ---- BSP entry (32-bit). ESI keeps the hvm_start_info address throughout. ---- */
    .pushsection .text.entry32, "ax", @progbits
    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    cld
    movl %ebx, %esi

    /* Zero .bss: the loader may not have. */
    movl $__kit_bss_start, %edi
    movl $__kit_bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* SEV: with paging off every access is private (the guest's key), with paging on only
     * those through entries carrying the C-bit, so the boot tables need it on an SEV guest's
     * RAM or the kit would read its own image, the boot data and the secret as ciphertext.
     * Active SEV is told as Linux tells it (get_sev_encryption_bit in
     * arch/x86/boot/compressed/mem_encrypt.S): CPUID 0x8000001F EAX bit 1, then
     * MSR_AMD64_SEV (0xc0010131) bit 0; the C-bit is EBX[5:0], above bit 31 on every SEV
     * part. The LAPIC's page stays shared. Page tables themselves are always read private. */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x8000001f, %eax
    jb 2f
    movl $0x8000001f, %eax
    cpuid
    btl $1, %eax
    jnc 2f
    movl %ebx, %edi
    movl $0xc0010131, %ecx
    rdmsr
    btl $0, %eax
    jnc 2f
    movl %edi, %ecx
    andl $0x3f, %ecx
    cmpl $32, %ecx
    jb 2f
    subl $32, %ecx
    movl $1, %eax
    shll %cl, %eax
    movl %eax, kit_c_bit_mask + 4
    orl %eax, kit_pml4 + 4
    orl %eax, kit_pdpt + 4
    movl $kit_pd_low + 4, %edi
    movl $512, %ecx
1:
    orl %eax, (%edi)
    addl $8, %edi
    loop 1b
2:
    KIT_ENTER_LONG_MODE kit_bsp_entry64

    /* ---- AP entry (32-bit), reached from the trampoline with CS = 0x18. ---- */
kit_ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    KIT_ENTER_LONG_MODE kit_ap_entry64

    .code64
kit_bsp_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq kit_bsp_stack_top(%rip), %rsp
    movl %esi, %edi
    call {kit_main}
    jmp kit_park

kit_ap_entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    /* Ticket = arrival order; it picks the stack. Surplus APs (no stack) park. */
    movl $1, %eax
    lock xaddl %eax, {arrivals}(%rip)
    cmpl $({max_cpus} - 1), %eax
    jae kit_park
    movl %eax, %edi
    movl %eax, %ecx
    incl %ecx
    shlq ${ap_shift}, %rcx
    leaq kit_ap_stacks(%rip), %rsp
    addq %rcx, %rsp
    call {ap_main}
kit_park:
    cli
    hlt
    jmp kit_park
    .popsection

    /* ---- AP trampoline: copied below 1 MiB, never run in place. ----
     * Starts in real mode at CS:IP = (TRAMPOLINE_BASE >> 4):0. */
    .pushsection .rodata.kit_trampoline, "a", @progbits
    .code16
    .globl kit_trampoline_start, kit_trampoline_end
kit_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl kit_trampoline_gdt_ptr - kit_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $kit_ap_entry32
    .balign 8
kit_trampoline_gdt_ptr:
    .word kit_gdt_end - kit_gdt - 1
    .long kit_gdt
kit_trampoline_end:
    .code64
    .popsection
"#,
    mapped_gib = const MAPPED_GIB,
    bsp_stack = const BSP_STACK_SIZE,
    ap_stack = const AP_STACK_SIZE,
    max_cpus = const MAX_CPUS,
    ap_shift = const AP_STACK_SHIFT,
    kit_main = sym crate::boot::kit_main,
    ap_main = sym crate::smp::ap_main,
    arrivals = sym crate::smp::AP_ARRIVALS,
    options(att_syntax)
);

extern "C" {
    /// First byte of the AP trampoline (real-mode code), to be copied to `TRAMPOLINE_BASE`.
    pub static kit_trampoline_start: u8;
    /// End (exclusive) of the AP trampoline.
    pub static kit_trampoline_end: u8;
}
