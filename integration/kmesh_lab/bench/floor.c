// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The floor of the program-cost benchmark: one empty program per hook the datapath uses.
 * Attached with a bpf_link to the same cgroup as kmesh-plugin's programs, each runs on the very
 * calls ours run on, so kernel.bpf_stats' run_time_ns / run_cnt of the two, read over the same
 * windows, give our cost and what any program costs there (the stats' own clock reads, the
 * dispatch): ours as a multiple of the floor holds on any machine, nanoseconds do not.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define FLOOR(hook)                                     \
	SEC("cgroup/" #hook)                            \
	int floor_##hook(struct bpf_sock_addr *ctx)     \
	{                                               \
		return 1;                               \
	}

FLOOR(connect4)
FLOOR(connect6)
FLOOR(sendmsg4)
FLOOR(sendmsg6)
FLOOR(recvmsg4)
FLOOR(recvmsg6)
FLOOR(getpeername4)
FLOOR(getpeername6)
