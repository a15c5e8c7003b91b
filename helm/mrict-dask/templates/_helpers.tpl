{{/* Chart name. */}}
{{- define "mrict-dask.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
The DaskJob's name, which the operator also gives the Dask cluster. It prefixes the scheduler Service
("<name>-scheduler") and the worker Deployments ("<name>-default-worker-<10 chars>"), hence 40 chars at most.
*/}}
{{- define "mrict-dask.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mrict-dask.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mrict-dask.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mrict-dask.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mrict-dask.labels" -}}
helm.sh/chart: {{ include "mrict-dask.chart" . }}
{{ include "mrict-dask.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the pods the operator creates (it adds its own dask.org/* labels). */}}
{{- define "mrict-dask.podLabels" -}}
{{ include "mrict-dask.labels" . }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mrict-dask.image" -}}
{{- $repo := required "image.repository is required (the image built from deploy/Dockerfile)" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "mrict-dask.configPath" -}}/etc/mrict-dask/pipeline.yaml{{- end }}

{{/*
Storage environment for the pods that touch the data (job runner and workers; not the scheduler):
object storage and the DICOMweb input. Credentials are references to an existing Secret only.
*/}}
{{- define "mrict-dask.storageEnv" -}}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.s3.accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.s3.secretAccessKeyKey | quote }}
{{- if $.Values.s3.sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.s3.sessionTokenKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.dicomweb.credentialsSecret }}
{{- range $var, $key := dict "MRICT_DICOMWEB_USER" $.Values.dicomweb.userKey "MRICT_DICOMWEB_PASSWORD" $.Values.dicomweb.passwordKey "MRICT_DICOMWEB_TOKEN" $.Values.dicomweb.tokenKey }}
{{- if $key }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.dicomweb.credentialsSecret | quote }}
      key: {{ $key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the three pod specs; call with (dict "root" $ "part" .Values.<component>). */}}
{{- define "mrict-dask.podCommon" -}}
{{- $root := .root }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.serviceAccountName }}
serviceAccountName: {{ . | quote }}
{{- end }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.part.nodeSelector | default $root.Values.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.part.tolerations | default $root.Values.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (.part.affinity | default $root.Values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container-level settings shared by the three containers; call with (dict "root" $ "part" .Values.<component>). */}}
{{- define "mrict-dask.containerCommon" -}}
image: {{ include "mrict-dask.image" .root | quote }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
{{- with .root.Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .part.resources }}
resources:
  {{- include "mrict-dask.resources" . | trim | nindent 2 }}
{{- end }}
{{- end }}

{{- define "mrict-dask.scratchVolume" -}}
- name: scratch
{{- if .Values.scratch.sizeLimit }}
  emptyDir:
    sizeLimit: {{ .Values.scratch.sizeLimit | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/*
Resource requirements with every quantity as a string: the operator's CRDs type quantities as strings,
so `cpu: 2` written as a number in values would be refused by the API server.
*/}}
{{- define "mrict-dask.resources" -}}
{{- range $section, $quantities := . }}
{{ $section }}:
{{- if eq $section "claims" }}
{{- toYaml $quantities | nindent 2 }}
{{- else }}
{{- range $name, $q := $quantities }}
  {{ $name }}: {{ $q | toString | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
