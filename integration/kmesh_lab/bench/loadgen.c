// SPDX-License-Identifier: Apache-2.0
/*
 * loadgen: the benchmark's connection client and server, in C so that Python is never the
 * bottleneck of a datapath measurement.
 *
 *   loadgen server PORT THREADS
 *       Dual-stack listener on [::]:PORT, one SO_REUSEPORT socket per thread. Per connection:
 *       read once; if the client sent a request, answer "OK\n"; close. Prints "ready".
 *
 *   loadgen client ADDR PORT MODE DURATION_MS THREADS
 *       MODE "cc": connect + close. MODE "rr": connect, send "GET\n", read the answer, close.
 *       Every connection is new (a new connect(), so a new load-balancing decision). Closes
 *       with SO_LINGER 0 (RST): no TIME_WAIT, so ports never run out in a long loop.
 *       Prints one JSON line: connections, errors by errno, seconds, rate, latency percentiles.
 *
 * Bounded by design: a client stops after DURATION_MS (at most 600 s), a server on SIGTERM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_DURATION_MS 600000
#define MAX_ERRNO 256
#define SAMPLE_CAP (1u << 22) /* latencies kept per thread; more are counted, not kept */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- server ------------------------------------------------------------------------------ */

static int listen_on(int port)
{
	struct sockaddr_in6 addr = { .sin6_family = AF_INET6, .sin6_port = htons(port),
				     .sin6_addr = IN6ADDR_ANY_INIT };
	int one = 1, zero = 0;
	int fd = socket(AF_INET6, SOCK_STREAM, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 4096) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void *serve(void *arg)
{
	int lfd = *(int *)arg;
	char buf[64];

	for (;;) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			return NULL;
		}
		if (recv(fd, buf, sizeof(buf), 0) > 0)
			send(fd, "OK\n", 3, MSG_NOSIGNAL);
		close(fd);
	}
}

static int run_server(int port, int threads)
{
	pthread_t tid[MAX_THREADS];
	int fds[MAX_THREADS];

	for (int i = 0; i < threads; i++) {
		fds[i] = listen_on(port);
		if (fds[i] < 0) {
			fprintf(stderr, "loadgen server: listen on port %d: %s\n", port,
				strerror(errno));
			return 1;
		}
	}
	for (int i = 0; i < threads; i++)
		pthread_create(&tid[i], NULL, serve, &fds[i]);
	printf("ready\n");
	fflush(stdout);
	for (int i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	return 0;
}

/* ---- client ------------------------------------------------------------------------------ */

struct target {
	struct sockaddr_storage addr;
	socklen_t len;
	int family;
	int rr;
	uint64_t deadline;
};

struct worker {
	const struct target *t;
	uint64_t count;
	uint64_t errors[MAX_ERRNO];
	uint32_t *samples; /* latency in ns, capped */
	uint64_t kept;
};

static int one_connection(const struct target *t)
{
	struct linger lg = { .l_onoff = 1, .l_linger = 0 };
	char buf[16];
	int err = 0;
	int fd = socket(t->family, SOCK_STREAM, 0);

	if (fd < 0)
		return errno;
	if (connect(fd, (const struct sockaddr *)&t->addr, t->len) < 0) {
		err = errno;
	} else if (t->rr) {
		if (send(fd, "GET\n", 4, MSG_NOSIGNAL) != 4)
			err = errno ? errno : EIO;
		else if (recv(fd, buf, sizeof(buf), 0) <= 0)
			err = errno ? errno : ECONNRESET;
	}
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(fd);
	return err;
}

static void *drive(void *arg)
{
	struct worker *w = arg;

	for (;;) {
		uint64_t start = now_ns();
		int err;

		if (start >= w->t->deadline)
			break;
		err = one_connection(w->t);
		if (err) {
			w->errors[err < MAX_ERRNO ? err : 0]++;
			continue;
		}
		w->count++;
		if (w->kept < SAMPLE_CAP) {
			uint64_t d = now_ns() - start;

			w->samples[w->kept++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
		}
	}
	return NULL;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

static double percentile(const uint32_t *sorted, uint64_t n, double p)
{
	if (!n)
		return 0;
	return sorted[(uint64_t)((double)(n - 1) * p)] / 1000.0;
}

static int run_client(const char *host, int port, const char *mode, long duration_ms, int threads)
{
	struct target t = { 0 };
	struct worker *w = calloc((size_t)threads, sizeof(*w));
	pthread_t tid[MAX_THREADS];
	struct sockaddr_in *v4 = (struct sockaddr_in *)&t.addr;
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&t.addr;
	uint64_t total = 0, kept = 0, errors[MAX_ERRNO] = { 0 };
	uint64_t started, elapsed;
	uint32_t *all;
	int first = 1;

	if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
		v4->sin_family = t.family = AF_INET;
		v4->sin_port = htons(port);
		t.len = sizeof(*v4);
	} else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
		v6->sin6_family = t.family = AF_INET6;
		v6->sin6_port = htons(port);
		t.len = sizeof(*v6);
	} else {
		fprintf(stderr, "loadgen client: %s is not an IP address\n", host);
		return 2;
	}
	t.rr = strcmp(mode, "rr") == 0;
	started = now_ns();
	t.deadline = started + (uint64_t)duration_ms * 1000000ull;
	for (int i = 0; i < threads; i++) {
		w[i].t = &t;
		w[i].samples = malloc(SAMPLE_CAP * sizeof(uint32_t));
		pthread_create(&tid[i], NULL, drive, &w[i]);
	}
	for (int i = 0; i < threads; i++) {
		pthread_join(tid[i], NULL);
		total += w[i].count;
		kept += w[i].kept;
		for (int e = 0; e < MAX_ERRNO; e++)
			errors[e] += w[i].errors[e];
	}
	elapsed = now_ns() - started;
	all = malloc((kept ? kept : 1) * sizeof(uint32_t));
	kept = 0;
	for (int i = 0; i < threads; i++) {
		memcpy(all + kept, w[i].samples, w[i].kept * sizeof(uint32_t));
		kept += w[i].kept;
		free(w[i].samples);
	}
	qsort(all, kept, sizeof(uint32_t), cmp_u32);
	printf("{\"connections\": %llu, \"seconds\": %.6f, \"rate\": %.1f, "
	       "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"errors\": {",
	       (unsigned long long)total, elapsed / 1e9, total / (elapsed / 1e9),
	       percentile(all, kept, 0.50), percentile(all, kept, 0.90),
	       percentile(all, kept, 0.99));
	for (int e = 0; e < MAX_ERRNO; e++) {
		if (!errors[e])
			continue;
		printf("%s\"%d\": %llu", first ? "" : ", ", e, (unsigned long long)errors[e]);
		first = 0;
	}
	printf("}}\n");
	free(all);
	free(w);
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && strcmp(argv[1], "server") == 0) {
		int threads = atoi(argv[3]);

		if (threads < 1 || threads > MAX_THREADS)
			return 2;
		return run_server(atoi(argv[2]), threads);
	}
	if (argc == 7 && strcmp(argv[1], "client") == 0) {
		long duration = atol(argv[5]);
		int threads = atoi(argv[6]);

		if (duration < 1 || duration > MAX_DURATION_MS || threads < 1 ||
		    threads > MAX_THREADS)
			return 2;
		return run_client(argv[2], atoi(argv[3]), argv[4], duration, threads);
	}
	fprintf(stderr, "usage: loadgen server PORT THREADS\n"
			"       loadgen client ADDR PORT cc|rr DURATION_MS THREADS\n");
	return 2;
}
