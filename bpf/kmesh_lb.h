/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The records shared by every kmesh-plugin BPF program and by the Python core.
 *
 * This header is the only place the kernel side declares a map layout. The Python side declares
 * the same layouts once, in kmesh_plugin/datapath/records.py, and a test compares both against the
 * BTF that clang emits for this file, so the two cannot drift apart silently.
 *
 * Update protocol (see README "How an update reaches the kernel"): every load-balanced service
 * group (one Service port, one protocol, one IP family) owns two *sets* of records. The active
 * set is named by kmesh_active[sid]; the core writes the inactive set, flips kmesh_active[sid]
 * and then waits for an RCU grace period before it touches the old set again. A connect() thus
 * reads one consistent set from start to end, and a full recompute switches at once.
 */
#ifndef KMESH_LB_H
#define KMESH_LB_H

#include <linux/types.h>

/* Capacities. The core passes its plugin.toml values with -D when it compiles the object;
 * these defaults match the shipped plugin.toml. */
#ifndef KMESH_MAX_SERVICES
#define KMESH_MAX_SERVICES 16384 /* service groups (Service x port x protocol x family) */
#endif
#ifndef KMESH_MAX_ENDPOINTS
#define KMESH_MAX_ENDPOINTS 131072 /* endpoint slots, both sets counted */
#endif

/* Tiers: a routing preference has at most KMESH_MAX_TIERS - 1 scopes, which gives tiers
 * 0 .. KMESH_MAX_TIERS - 1. It also bounds the tier loop in the program. */
#define KMESH_MAX_TIERS 8
#define KMESH_SETS 2 /* double-buffered record sets per service group */

/* The version of the map layouts below. The loader records it beside the pinned maps and
 * refuses to reuse maps of another version (a changed struct would be misread). */
#define KMESH_LAYOUT_VERSION 8

/* How the core filled a set's tiers. The kernel treats FAILOVER and RANDOM alike (the first
 * non-empty tier wins; RANDOM puts everything in tier 0); STRICT never looks past tier 0. */
#define KMESH_MODE_RANDOM 0
#define KMESH_MODE_FAILOVER 1
#define KMESH_MODE_STRICT 2

/* Which sockets are ours (SPEC.md section 9), kmesh_config.enrolment. */
#define KMESH_ENROL_ALL 0 /* every socket in the attached cgroup subtree */
#define KMESH_ENROL_CNI 1 /* only sockets whose network namespace is in kmesh_enrolled */

/* Network namespaces kmesh_enrolled holds at most (pods on one node, with room to spare). */
#define KMESH_MAX_PODS 8192

/* Entries of the two LRU maps: kmesh_reverse (one per translated socket and endpoint) and
 * kmesh_affinity (one per client and sessionAffinity frontend). An evicted entry costs what
 * the README states ("Beyond connect()"), never a wrong endpoint. */
#define KMESH_MAX_REVERSE 65536
#define KMESH_MAX_AFFINITY 65536

/* Entries of kmesh_translated, a power of two: a slot is a hash masked with it - 1. */
#define KMESH_MAX_TRANSLATED 65536

/* A binary search of one tier (sessionAffinity) takes at most this many steps: a tier holds at
 * most 65,535 endpoints (count is a __u16), and 2^16 > 65,535. */
#define KMESH_SEARCH_STEPS 16

/* kmesh_config[0]: settings the loader writes before it attaches a program. An all-zero entry
 * (a map just created) means enrolment ALL. */
struct kmesh_config {
	__u32 enrolment; /* KMESH_ENROL_* */
	__u32 pad;
};

/* kmesh_enrolled: the netns cookie (bpf_get_netns_cookie, SO_NETNS_COOKIE) of every pod the
 * chained CNI plugin set up -> what it recorded. */
struct kmesh_enrolment {
	__u32 flags; /* none defined yet: 0 */
	__u32 pad;
};

/* kmesh_frontends: ClusterIP:port/protocol -> service group id.
 * IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d) so one key type serves connect4 and
 * connect6 alike, and an IPv6 socket connecting to a v4-mapped ClusterIP finds the v4 frontend. */
struct kmesh_frontend_key {
	__u8 addr[16];
	__be16 port;
	__u8 protocol; /* IPPROTO_TCP, IPPROTO_UDP, ... */
	__u8 pad;
};

struct kmesh_frontend {
	__u32 sid;
};

/* kmesh_frontend_cache[line] (ARRAY): a copy of kmesh_frontends, consulted first. A hash
 * lookup costs jhash over 20 bytes, a bucket walk and a compare: about 50 ns, a third of what
 * the whole program may cost; an array lookup is inlined by the verifier. A frontend may sit in
 * any line of two pairs (a pair is lines p and p + 1, one 64-byte cache line): p is the low
 * half of h = kmesh_frontend_hash(key) masked to the cache with its lowest bit cleared, the
 * second pair's p the high half so masked. The program reads the first pair, and the second on
 * a miss. check = (h ^ sid << 32) | 1, 0 for an empty line. Only the core writes it (a
 * frontend's line after its kmesh_frontends insert, cleared or handed to another frontend
 * before its delete; a frontend whose four lines are taken moves one of their holders to a
 * free line of its other pair first), so every line names a frontend kmesh_frontends holds
 * with the sid it holds; kmesh_frontends stays the truth, and finds a frontend that found no
 * line. A write from user space is a plain copy, so a program may read a line half written:
 * check covers the key and the sid, and a mixture fails it (for two keys, unless their hashes
 * agree) and reads as a miss. A wrong sid would be caught anyway by the record's frontend
 * (struct kmesh_record): never another Service. */
#ifndef KMESH_FRONTEND_LINES
#define KMESH_FRONTEND_LINES 65536 /* a power of two >= 4 x KMESH_MAX_SERVICES (build.py) */
#endif
#define KMESH_FRONTEND_WAYS 2 /* lines of a pair; the program tries both of each pair */
#define KMESH_FRONTEND_SEED 0x9e3779b97f4a7c15ULL

struct kmesh_frontend_line {
	struct kmesh_frontend_key frontend;
	__u32 sid;
	__u64 check;
};

/* kmesh_vips: every ClusterIP (v4-mapped like the frontend key). A connect to a ClusterIP on a
 * port or protocol that is no frontend is refused instead of leaving the node untranslated. */
struct kmesh_vip {
	__u8 addr[16];
};

/* An endpoint: what kmesh_slots holds, and what a record carries copies of. */
struct kmesh_endpoint {
	__u8 addr[16]; /* v4-mapped for IPv4, like the frontend key */
	__be16 port;
	__u16 pad;
};

/* A record carries copies of the first KMESH_INLINE_SLOTS slots of the tier a connect picks
 * from (the first non-empty tier; tier 0 in strict mode): a pick among them reads the record
 * the program has looked up already, instead of a kmesh_slots hash lookup (~35 ns, a third of
 * what the rest of the program may cost). Tiers this small are the common case: locality
 * makes them so. A power of two: the index is masked for the verifier. */
#define KMESH_INLINE_SLOTS 4

/* kmesh_records[sid * KMESH_SETS + set]: what one set of a service group holds.
 *
 * frontend: the frontend this group serves. kmesh_frontends is a preallocated hash, whose
 * deleted (or updated) elements the kernel hands to the next insert at once, while a connect()
 * that looked the old element up may still read it: it can then read another group's sid.
 * A group's sid is given to another frontend only a grace period after its group went, so
 * the record of any sid such a reader finds names the frontend that sid serves; the program
 * compares it with the key it looked up, and a mismatch counts as "no such frontend". */
struct kmesh_record {
	struct kmesh_frontend_key frontend;
	__u32 generation; /* bumped by every publish; for operators and tests */
	__u8 mode;        /* KMESH_MODE_* */
	__u8 ntiers;      /* tiers in use, <= KMESH_MAX_TIERS */
	__u8 inline_tier; /* the tier inline_slots copies */
	__u8 pad;
	__u16 count[KMESH_MAX_TIERS]; /* endpoints per tier */
	/* sessionAffinity ClientIP: seconds an affinity lasts after its last use; 0 = none. With
	 * affinity, each tier is sorted by endpoint (address bytes, then port, both in network
	 * order), so that the program can find a client's endpoint by binary search. */
	__u32 affinity_timeout;
	/* Slots 0 .. KMESH_INLINE_SLOTS - 1 of inline_tier, as kmesh_slots holds them (as many
	 * as the tier has; the rest zero). Written with the record, so in the same set. */
	struct kmesh_endpoint inline_slots[KMESH_INLINE_SLOTS];
};

/* kmesh_slots: (sid, set, tier, index) -> endpoint. index < record.count[tier]. */
struct kmesh_slot_key {
	__u32 sid;
	__u8 set;
	__u8 tier;
	__u16 index;
};

/* kmesh_stats[sid] (per-CPU): connects per tier, and refusals, of one service group. The
 * core zeroes a sid's counters when it gives the sid to a new group. */
struct kmesh_stats {
	__u64 hits[KMESH_MAX_TIERS];
	__u64 refused;
};

/* kmesh_reverse (LRU): (socket, endpoint) -> the frontend that socket asked for, written by an
 * unconnected UDP sendmsg() that translated it, and by the first getpeername() or recvmsg()
 * that found a connect's entry in kmesh_translated, so that getpeername() and recvmsg() show
 * the ClusterIP:port instead of the endpoint. Keyed by socket cookie: two sockets never see
 * each other's entries, and a cookie is never reused while the kernel runs, so an entry left
 * by a closed socket matches nothing until the LRU evicts it. (Socket storage would need no
 * eviction, but creating it costs about 1 us per connect: several times the rest of the
 * program.) */
struct kmesh_reverse_key {
	__u64 socket_cookie;
	struct kmesh_endpoint endpoint;
	__u32 pad;
};

struct kmesh_reverse {
	struct kmesh_frontend_key frontend;
};

/* kmesh_translated[slot] (ARRAY): the connects translated last, one per slot, slot = a hash of
 * (socket cookie, endpoint). connect() writes here with plain stores, because every map update
 * costs a lock or an atomic, which on the machines we measured is several times the rest of
 * the program. getpeername() and recvmsg() look in kmesh_reverse first and then here, and
 * move what they find here into kmesh_reverse, whose LRU keeps it while it is used; a slot
 * overwritten before its socket asked costs that socket its reverse translation, as an LRU
 * eviction would (README "Beyond connect()").
 *
 * No lock guards a slot: two CPUs may write one at once, and a reader may see a write half
 * done. check, written last, is kmesh_check over the other fields: a reader uses an entry only
 * when its socket cookie and endpoint are the reader's and check matches what it read, so a
 * torn or mixed entry is taken for a miss, not for another frontend (a universal hash: a
 * mixture passes it with odds of about 2^-32, and a torn read is itself a race of
 * nanoseconds between two sockets whose cookies are 65,536 apart). check 0 marks an empty or
 * forgotten slot. */
struct kmesh_translation {
	__u64 socket_cookie;
	struct kmesh_endpoint endpoint;
	struct kmesh_frontend_key frontend;
	__u64 check;
	__u64 pad; /* one 64-byte cache line per slot */
};

/* kmesh_affinity (LRU): (client, frontend) -> the endpoint that client is held to. The client
 * is its network namespace (bpf_get_netns_cookie): one per pod, as a pod IP is for
 * kube-proxy, and known at connect() time, when the source address is not yet chosen. */
struct kmesh_affinity_key {
	__u64 netns_cookie;
	struct kmesh_frontend_key frontend;
	__u32 pad;
};

struct kmesh_affinity {
	struct kmesh_endpoint endpoint;
	__u16 tier;  /* where the endpoint was last found: checked first, searched on a miss */
	__u16 index;
	__u64 last_used; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last connect it decided */
};

#endif /* KMESH_LB_H */
